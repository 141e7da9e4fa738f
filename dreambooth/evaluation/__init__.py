"""Evaluation of personalized models: shapes-world measures and the paper's DINO / CLIP-I / CLIP-T."""
