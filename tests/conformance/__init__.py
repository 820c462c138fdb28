"""Conformance runners kept in the repository (the Autobahn|Testsuite)."""
