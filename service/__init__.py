"""The product's composition: `analysis` (one field), `ingest` (image files), `station` (the
daemon), `mqtt` (messaging) and `config` (pure settings models). Installed as `smearscope.service`."""
