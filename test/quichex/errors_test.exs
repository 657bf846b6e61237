defmodule Quichex.ErrorsTest do
  # The two error structs: each reason their moduledocs list has a message
  # that says what happened, and they can be raised.
  use ExUnit.Case, async: true

  alias Quichex.{ApplicationError, TransportError}

  defp message(reason), do: Exception.message(%TransportError{reason: reason})

  test "every documented TransportError reason has its own message" do
    assert message(:handshake_timeout) == "handshake timed out"
    assert message(:idle_timeout) == "idle timeout"
    assert message(:closed) == "connection closed"
    assert message({:resolve, :nxdomain}) == "cannot resolve host: non-existing domain"
    assert message({:socket, :eaddrinuse}) == "socket error: :eaddrinuse"

    assert message({:tls_file, :load_priv_key_from_pem_file, "/no/key.pem"}) ==
             ~s[cannot load load_priv_key_from_pem_file from "/no/key.pem" (missing, not PEM, or key/cert mismatch)]

    assert message({:invalid_option, :cc_algorithm}) == "invalid config option cc_algorithm"
    assert message(:no_system_ca_certs) =~ "SSL_CERT_FILE"
    assert message(:invalid_session) == "the session ticket cannot be resumed"
    assert message(:stateless_reset) =~ "stateless reset"
    assert message(:tls_fail) == "QUIC error: :tls_fail"
    assert message({:invalid_stream_state, 4}) == "QUIC error: {:invalid_stream_state, 4}"
  end

  test "transport error codes print in hex; 0x100..0x1ff name their TLS alert" do
    assert message({:transport, 0x178, "no ALPN"}) ==
             ~s[transport error 0x178 (TLS alert 120): "no ALPN"]

    assert message({:transport, 0x12A, ""}) == ~s[transport error 0x12A (TLS alert 42): ""]
    assert message({:transport, 0x3, "flow"}) == ~s[transport error 0x3: "flow"]
    assert message({:transport, 0x200, ""}) == ~s[transport error 0x200: ""]
  end

  test "ApplicationError: the code, and the phrase when there is one" do
    assert Exception.message(%ApplicationError{code: 258}) ==
             "peer application error 258 (connection_close)"

    assert Exception.message(%ApplicationError{code: 0, phrase: "bye"}) ==
             ~s[peer application error 0 (connection_close): "bye"]
  end

  test "both are exceptions: raise and rescue them like any other" do
    assert_raise TransportError, "handshake timed out", fn ->
      raise %TransportError{reason: :handshake_timeout}
    end

    assert_raise ApplicationError, ~r/error 7/, fn -> raise %ApplicationError{code: 7} end
  end
end
