"""``kdforge demo``: every method on the bundled digits data, one table."""
