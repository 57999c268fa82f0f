module github.com/kongtie/kongtie-gateway/gen/go

go 1.19

// The versions the committed code was generated and built against
// (protoc-gen-go v1.28.1, protoc-gen-go-grpc 1.0); any later ones work.
require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
