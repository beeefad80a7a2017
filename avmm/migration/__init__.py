"""Live migration: a snapshot streamed while the guest runs (DESIGN.md, "State,
snapshot and migration"; README, "Live migration").

* :mod:`.stream`: the wire protocol (a header, then typed frames declared with construct).
* :mod:`.transport`: ``unix:/abs/path`` and ``tcp:HOST:PORT`` over trio sockets.
* :mod:`.source`: pre-copy rounds, stop-and-copy and the hand-over, for ``vm.migrate``.
* :mod:`.destination`: receiving into a new VM, for ``VirtualMachine.receive``.
* :mod:`.dirty`: dirty-page tracking (KVM's log, avmm's own writes, vhost-user logs).
"""

from .errors import HandOverUnconfirmed as HandOverUnconfirmed
from .errors import MigrationError as MigrationError
from .progress import MigrationProgress as MigrationProgress
