"""The command line and what it runs (`dpspeed train`, its data and models); not the library."""
