"""Every use of a dependency's private API, in one place, one module per dependency.

The speed work reaches into pyOpenSSL, Twisted, h2 and acme where their public
APIs have no way to do the job.  Such a use may break with any release, so:

- nothing outside this package names a private attribute of a dependency
  (tests/unit/test_compat.py reads every module of tlsproxy to keep it so);
- each module here says which releases it was tested with, and pyproject.toml
  bounds the dependency to them (constraints.txt pins what CI and the image use);
- each private name has a canary test in tests/unit/test_compat.py that fails
  loudly, naming the module here to update, when a release moves it.
"""
