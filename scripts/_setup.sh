# Shared by scripts/demo and scripts/test (sourced, not run): find a Python,
# make the virtual environment the project is installed into, install OS
# packages that are missing.
#
# Which virtual environment:
#   STOCKPYLE_VENV=DIR   this one (created if missing);
#   otherwise an activated one ($VIRTUAL_ENV);
#   otherwise .venv in the checkout (created if missing).
# Which Python creates it: PYTHON (default python3), 3.10 or later. A system
# Python that refuses pip installs (Debian 12, Ubuntu 24.04: "externally
# managed environment") is fine: only the virtual environment is installed into.
#
# After setup_venv, $VENV_PYTHON is the environment's interpreter, with a pip
# that knows --group (dependency groups, pip 25.1 and later).

# pip 25.1 added "pip install --group" (PEP 735 dependency groups).
STOCKPYLE_MIN_PIP="25.1"

say() {
    echo "${SCRIPT_NAME:-stockpyle}: $*" >&2
}

die() {
    say "$*"
    exit 1
}

# Install OS packages (names as Debian/Ubuntu call them) with the system's
# package manager; root or sudo is needed.
install_os_packages() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to install: $*"
        sudo="sudo"
    fi
    if command -v apt-get >/dev/null 2>&1; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
    elif command -v dnf >/dev/null 2>&1; then
        # Fedora names: redis provides redis-server and redis-cli
        local names=()
        for name in "$@"; do
            case "$name" in
                redis-server | redis-tools) names+=(redis) ;;
                python3*-venv) ;; # part of the python3 package there
                *) names+=("$name") ;;
            esac
        done
        [ ${#names[@]} -eq 0 ] || $sudo dnf install -y "${names[@]}"
    elif command -v brew >/dev/null 2>&1; then
        local names=()
        for name in "$@"; do
            case "$name" in
                redis-server | redis-tools) names+=(redis) ;;
                python3*-venv) ;;
                *) names+=("$name") ;;
            esac
        done
        [ ${#names[@]} -eq 0 ] || brew install "${names[@]}"
    else
        die "cannot install $* on this system (no apt-get, dnf or brew); install them and re-run"
    fi
}

setup_venv() {
    local python="${PYTHON:-python3}"
    local venv="${STOCKPYLE_VENV:-${VIRTUAL_ENV:-.venv}}"
    if [ ! -x "$venv/bin/python" ]; then
        command -v "$python" >/dev/null 2>&1 || die "no $python found; install Python 3.10 or later, or set PYTHON"
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
            die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); stockpyle needs 3.10 or later (set PYTHON)"
        if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            # Debian and Ubuntu ship venv's pip bootstrap separately
            local version
            version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            say "installing python$version-venv from the OS packages (needed to create a virtual environment)"
            install_os_packages "python$version-venv"
        fi
        say "creating the virtual environment $venv with $python"
        "$python" -m venv "$venv"
    fi
    VENV_PYTHON="$(cd "$venv" && pwd)/bin/python"
    if ! "$VENV_PYTHON" - "$STOCKPYLE_MIN_PIP" <<'EOF'; then
import sys
from importlib.metadata import version
have = tuple(int(part) for part in version("pip").split(".")[:2] if part.isdigit())
sys.exit(have < tuple(int(part) for part in sys.argv[1].split(".")))
EOF
        say "upgrading pip in $venv to $STOCKPYLE_MIN_PIP or later (for dependency groups)"
        "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check "pip>=$STOCKPYLE_MIN_PIP"
    fi
}
