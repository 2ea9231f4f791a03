"""What the trainer's processes need of the operating system, beside the entry points of ``trainer/``:
child processes for the launchers (:mod:`.processes`), file descriptors kept in reserve
(:mod:`.fds`), the rate-limited log (:mod:`.logs`) and the one-trainer-per-run-folder lock
(:mod:`.run_lock`)."""
