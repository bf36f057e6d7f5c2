"""The key roles of the update framework, named where anything can import them cheaply
(``upgradectl`` builds its help from them without loading python-tuf).

``TUF_ROLES`` are the four top-level roles of the TUF specification
(https://theupdateframework.github.io/specification/latest/#roles-and-pki); ``command``
is this product's own role, the key that signs UpgradeCommands (its keys are listed in
root, ``keys.COMMAND_KEYS_FIELD``).
"""

TUF_ROLES = ("root", "targets", "snapshot", "timestamp")
ROLES = (*TUF_ROLES, "command")
# Kept off the controller host: the key ceremony signs with them.
OFFLINE_ROLES = frozenset({"root", "targets"})
