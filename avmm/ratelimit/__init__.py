"""I/O rate limiters: token buckets for bytes and requests (see :mod:`._bucket`)."""

from ._bucket import BUCKET_KINDS as BUCKET_KINDS
from ._bucket import BucketConfig as BucketConfig
from ._bucket import BucketKind as BucketKind
from ._bucket import Clock as Clock
from ._bucket import RateLimitConfig as RateLimitConfig
from ._bucket import RateLimiter as RateLimiter
from ._bucket import Throttle as Throttle
from ._bucket import TokenBucket as TokenBucket
from ._devices import DIRECTIONS as DIRECTIONS
from ._devices import DeviceLimits as DeviceLimits
from ._devices import LimitTargetError as LimitTargetError
from ._devices import SharedGroups as SharedGroups
from ._devices import UnknownGroupError as UnknownGroupError
