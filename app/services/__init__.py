"""The work itself, callable without a broker."""
