"""Text to training batches: sources read in ranges, tokenized once into shards (prepared data), a sampler with one
order for every worker count, and dynamic masking."""
