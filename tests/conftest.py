"""Test configuration: helper scripts that must not be imported by pytest."""

collect_ignore = ["sharding_check.py"]
