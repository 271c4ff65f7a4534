"""Fixtures shared by the integration tests: the browser of the console's tests."""

from tests.integration.browser import browser  # noqa: F401 (a fixture, found by name)
