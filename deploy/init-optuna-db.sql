-- A second database on the same server for Optuna studies (search.optuna.storage).
CREATE DATABASE optuna;
