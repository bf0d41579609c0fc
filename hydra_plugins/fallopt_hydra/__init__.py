"""fallopt's Hydra plugins: the default sweeper and the Ray launcher.

`hydra/sweeper=basic` (fallopt's replacement of Hydra's, `sweeper.py`) and
`hydra/launcher=ray` (`ray_launcher.py`). Hydra instantiates plugins only from the
`hydra_plugins` namespace, and imports every module in it when it starts: keep them light.
"""
