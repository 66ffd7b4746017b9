//! Training a taming-style VQGAN on the tape (filled in by the VQGAN trainer).
