"""FL-W3S library shared by the Flower apps and the jobs; knows nothing of Flower messages."""
