"""Explicit memory: the encoder (reference -> memory) and the on-disk memory bank.

Modules: `bank` (the bank of DESIGN §4: open/create/append/delete/gather), `codecs` (storage
codecs and their registry), `shards` (fixed-size-row files), `meta` (meta.sqlite),
`manifest` (manifest.json), `cache` (LRU cache of decoded memories), `rewrite` (compact,
reencode, merge), `errors`; `encoder` turns references into memories.
"""
