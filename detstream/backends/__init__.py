"""Where a session's nodes come from: local processes, Slurm, or NERSC's Superfacility API."""

import warnings

# authlib (under sfapi_client) puts an "always" filter for its own deprecation warnings first in
# the warning filters when imported, then warns that its httpx integration is deprecated: nothing
# a user of detstream can act on, printed by every process that loads a backend (the `detstream`
# command, and Prefect's server, which loads the blocks). An ignore for that one message, placed
# ahead of authlib's filter, before any backend imports sfapi_client.
try:
    from authlib.deprecate import AuthlibDeprecationWarning
except ImportError:  # an sfapi_client without authlib: nothing to quiet
    pass
else:
    warnings.filterwarnings("ignore", message=r"The httpx module is deprecated",
                            category=AuthlibDeprecationWarning)
