"""I/O rate limiters: token buckets for bytes and requests (see :mod:`._bucket`)."""

from ._bucket import BUCKET_KINDS as BUCKET_KINDS
from ._bucket import BUCKET_SIZE_MAX as BUCKET_SIZE_MAX
from ._bucket import LIMITER_WAIT_SLICE_S as LIMITER_WAIT_SLICE_S
from ._bucket import REFILL_MS_MAX as REFILL_MS_MAX
from ._bucket import BucketConfig as BucketConfig
from ._bucket import BucketKind as BucketKind
from ._bucket import Clock as Clock
from ._bucket import RateLimitConfig as RateLimitConfig
from ._bucket import RateLimiter as RateLimiter
from ._bucket import Throttle as Throttle
from ._bucket import TokenBucket as TokenBucket
from ._bucket import limiter_wait_s as limiter_wait_s
from ._devices import DIRECTIONS as DIRECTIONS
from ._devices import DeviceLimits as DeviceLimits
from ._devices import LimitTargetError as LimitTargetError
from ._devices import SharedGroups as SharedGroups
from ._devices import UnknownGroupError as UnknownGroupError
from ._shared import ADMIT_LOCK_WAIT_S as ADMIT_LOCK_WAIT_S
from ._shared import RECONFIGURE_LOCK_WAIT_S as RECONFIGURE_LOCK_WAIT_S
from ._shared import SharedLimiterError as SharedLimiterError
from ._shared import SharedRateLimiter as SharedRateLimiter
