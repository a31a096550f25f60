"""What every run needs whatever it trains: device and precision, schedules, stop signals, torchrun, checkpoints,
run logs, config sections and atomic writes."""
