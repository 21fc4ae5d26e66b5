"""Where things are kept: local folders and S3-compatible stores behind one interface, the path rule for keys from
storage, ranged parallel downloads, and file manifests (size and sha256) that checkpoints and prepared data are checked against."""
