"""Hardware-in-the-loop kit: a baud-accurate, fault-injecting RS-485 line and its scenarios."""
