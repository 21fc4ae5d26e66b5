"""The typed configuration of a run: one pydantic section per component, the whole config, `--set` overrides."""
