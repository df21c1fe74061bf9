"""Test support code: real service processes and connection settings."""
