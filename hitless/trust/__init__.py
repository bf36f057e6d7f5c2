"""Signed releases and signed commands, on The Update Framework (python-tuf).

- ``keys``: the key directory (``init``, ``rotate``) and loading signers from it.
- ``release``: the release manager signs targets metadata with the offline targets key.
- ``repository``: the controller hosts the repository and signs snapshot and timestamp with
  its online keys; it accepts targets, never signs them.
- ``client``: gateways and the controller verify a target before staging it.
- ``commands``: UpgradeCommands signed with the command key carried in root.
- ``errors``: the exception tree.
"""
