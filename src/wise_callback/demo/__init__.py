"""The synthetic reasoning task and tiny model behind `wise-ft demo` and the tests."""
