"""dpspeed where users already work: Opacus scripts, the transformers Trainer."""
