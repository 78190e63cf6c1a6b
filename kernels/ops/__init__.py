"""One module per operator: its public functions, their input checks and its registry spec."""
