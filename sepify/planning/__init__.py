"""Plans: the versioned JSON recipe, the error model that predicts a plan's loss, and the knapsack solver."""
