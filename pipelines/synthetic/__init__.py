"""Generated data for the offline demo and the tests: shapes and captions, the loopback image server, features,
the checker.
"""
