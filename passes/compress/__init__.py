"""Structured compression: passes that make a model smaller (and, where the structure allows,
faster) at a measured cost in accuracy. ``infoptc.passes`` imports every module here.

    channel_groups.py   which channels must be removed together (the dependency analysis)
    prune_channels.py   prune-channels: remove channels group by group
    refit.py            least-squares reconstruction of the next layers on calibration data
"""
