//! Poly1305 over up to eight messages at once (AVX-512F).
