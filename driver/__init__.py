"""The library a caller's process uses to drive steering engines: start one with steering and
check that it steers (`launch`), capture hidden states through it (`capture`), add and remove
vectors while it runs (`runtime`). What runs inside vLLM's own processes is in engine/."""
