"""`slipstream acl passwords DIR [NAME...]` / `slipstream acl render --password-dir DIR`: the Redis ACL file.

See docs/security.md: one Redis user per role (learner, rollout, producer-*, status, admin), passwords in files.
"""

from bus.acl import add_arguments, run

TAKES_OVERRIDES = True  # `render` takes --bus.* overrides (stream names and prefix)

__all__ = ["TAKES_OVERRIDES", "add_arguments", "run"]
