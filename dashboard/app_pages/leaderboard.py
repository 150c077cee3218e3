from dashboard.views import leaderboard

leaderboard.render()
