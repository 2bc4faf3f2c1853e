"""The packaged DeepSpeed configs (the JSON files beside this one).

This folder is the one source of the configs. In a checkout it is the repository's top-level
`ds_configs/`; an install maps it into the package as `lxmert_fast.ds_configs` (setup.py's
`package_dir`), so `--deepspeed_config zero2.json` finds them from any directory.
"""
