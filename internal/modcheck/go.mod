module github.com/seed0ad592b7/advisory/internal/modcheck

go 1.25.0

require golang.org/x/mod v0.40.0
