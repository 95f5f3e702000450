"""What the tests share, and what bench/ may import without importing a test: the multi-process harness, local
servers (S3, webhooks), tiny configs and models, InternEvo reference rules, and the paths of the repository."""
