"""Development tools used by the scripts and the tests, not by any stage (outside the runtime package)."""
