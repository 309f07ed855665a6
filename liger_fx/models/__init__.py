"""Small built-in model configs for the coverage report and the tests."""
