"""The ``airlock`` command's exit codes, in one place (other tools depend on them).

====  =====================================================
0     done (convert: converted; verify: the file matches its signed provenance)
1     the artifact was rejected or its conversion failed (verify: verification failed)
2     usage error
3     the service is unreachable or unavailable
4     not authenticated, or not authorized for this operation
====  =====================================================

``airlock migrate`` adds 5 (nothing to do); its table is in ``_migrate_cli``.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_DENIED: Final = 4
