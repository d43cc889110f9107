"""`python -m edgetune …` (also `accelerate launch -m edgetune train …` for data parallel runs)."""

from .cli import main

if __name__ == "__main__":
    main()
