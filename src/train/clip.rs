//! Training a CLIP on the tape (filled in by the CLIP trainer).
