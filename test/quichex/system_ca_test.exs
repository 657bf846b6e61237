defmodule Quichex.SystemCATest do
  # Quichex.Config.load_system_ca_certs/1 reads SSL_CERT_FILE, which is
  # process-global: these tests set it, so they do not run concurrently.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Config, Connection, Listener}

  # The places the function documents, in its order.
  @system_ca_files [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
    "/usr/local/share/certs/ca-root-nss.crt"
  ]

  setup do
    saved = System.get_env("SSL_CERT_FILE")

    on_exit(fn ->
      if saved,
        do: System.put_env("SSL_CERT_FILE", saved),
        else: System.delete_env("SSL_CERT_FILE")
    end)
  end

  test "SSL_CERT_FILE comes first, and the client verifies the server against it" do
    System.put_env("SSL_CERT_FILE", certs().ca)

    config =
      Config.new(application_protos: [alpn()], verify_peer: true)
      |> Config.load_system_ca_certs()

    assert Config.get(config, :load_verify_locations_from_file) == certs().ca

    {listener, port} = start_listener()
    on_exit(fn -> Listener.stop(listener) end)
    {:ok, conn} = Connection.connect(host: "localhost", port: port, config: config)
    assert :ok = Connection.wait_connected(conn, timeout: 5_000)
  end

  test "without it, the first bundle of the usual places, or :no_system_ca_certs" do
    System.delete_env("SSL_CERT_FILE")

    case Enum.find(@system_ca_files, &File.regular?/1) do
      nil ->
        assert_raise Quichex.TransportError, ~r/no system CA certificates/, fn ->
          Config.load_system_ca_certs(Config.new())
        end

      bundle ->
        config = Config.load_system_ca_certs(Config.new())
        assert Config.get(config, :load_verify_locations_from_file) == bundle
    end
  end

  test "an empty SSL_CERT_FILE counts as unset" do
    System.put_env("SSL_CERT_FILE", "")
    expected = Enum.find(@system_ca_files, &File.regular?/1)

    if expected do
      config = Config.load_system_ca_certs(Config.new())
      assert Config.get(config, :load_verify_locations_from_file) == expected
    else
      assert_raise Quichex.TransportError, fn -> Config.load_system_ca_certs(Config.new()) end
    end
  end
end
