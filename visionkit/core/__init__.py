"""What every part of visionkit shares and no task owns: the device and its precision (``runtime``) and the run
directory's contract (``rundir``). Config stays in ``visionkit.config``."""
