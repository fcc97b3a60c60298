"""Helpers the tests import (`from tests.helpers.tiny_sd3 import build_tiny_sd3`); no tests here."""
