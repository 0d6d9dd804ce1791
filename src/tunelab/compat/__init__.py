"""Workarounds for behaviour of other libraries, one module per library; each names the behaviour, the versions
it applies to, and the test that tells when it can go."""
