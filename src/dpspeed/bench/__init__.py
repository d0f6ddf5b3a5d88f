"""`dpspeed bench`: what DP training costs on the user's own model and hardware (Sinha et al.'s
study as a tool) and `dpspeed report`: its tables, plots and recommendation."""
