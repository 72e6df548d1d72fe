"""Dataset interchange: :mod:`.importer` turns a LeRobotDataset v3.0 into a native
``fleetloop-demos`` dataset a job names as ``offline_dataset`` (``fleetloop data import``);
``exporter`` writes a job's data as a LeRobotDataset (``fleetloop data export``). A services layer
between ``cli`` and ``control``: it reads job specs (:mod:`services.control.jobspec`), the format
code lives in :mod:`fleetloop.lerobot`."""
