defmodule Quichex.Test.Certs do
  @moduledoc false
  # Test certificates made with the openssl CLI: a CA, a server certificate
  # for localhost / 127.0.0.1 / ::1 signed by it, an unrelated CA, a key that
  # matches nothing, and a file that is not PEM.

  def generate!(dir) do
    File.mkdir_p!(dir)
    path = &Path.join(dir, &1)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    openssl!(
      ["req", "-x509" | ec] ++
        [
          "-keyout",
          path.("ca.key"),
          "-out",
          path.("ca.pem"),
          "-days",
          "30",
          "-subj",
          "/CN=Quichex Test CA"
        ]
    )

    openssl!(
      ["req", "-x509" | ec] ++
        [
          "-keyout",
          path.("other.key"),
          "-out",
          path.("other_ca.pem"),
          "-days",
          "30",
          "-subj",
          "/CN=Unrelated CA"
        ]
    )

    openssl!(
      ["req" | ec] ++
        ["-keyout", path.("server.key"), "-out", path.("server.csr"), "-subj", "/CN=localhost"]
    )

    File.write!(path.("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n")

    openssl!([
      "x509",
      "-req",
      "-in",
      path.("server.csr"),
      "-CA",
      path.("ca.pem"),
      "-CAkey",
      path.("ca.key"),
      "-CAcreateserial",
      "-out",
      path.("server.pem"),
      "-days",
      "30",
      "-extfile",
      path.("ext.cnf")
    ])

    # Client certificates (mutual TLS): one from our CA, one from the
    # unrelated CA.
    File.write!(path.("client_ext.cnf"), "extendedKeyUsage=clientAuth\n")

    for {name, ca, ca_key} <- [
          {"client", "ca.pem", "ca.key"},
          {"rogue_client", "other_ca.pem", "other.key"}
        ] do
      openssl!(
        ["req" | ec] ++
          [
            "-keyout",
            path.(name <> ".key"),
            "-out",
            path.(name <> ".csr"),
            "-subj",
            "/CN=#{name}"
          ]
      )

      openssl!([
        "x509",
        "-req",
        "-in",
        path.(name <> ".csr"),
        "-CA",
        path.(ca),
        "-CAkey",
        path.(ca_key),
        "-CAcreateserial",
        "-out",
        path.(name <> ".pem"),
        "-days",
        "30",
        "-extfile",
        path.("client_ext.cnf")
      ])
    end

    File.write!(
      path.("garbage.pem"),
      "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )

    %{
      cert: path.("server.pem"),
      key: path.("server.key"),
      ca: path.("ca.pem"),
      other_ca: path.("other_ca.pem"),
      other_key: path.("other.key"),
      client_cert: path.("client.pem"),
      client_key: path.("client.key"),
      rogue_client_cert: path.("rogue_client.pem"),
      rogue_client_key: path.("rogue_client.key"),
      garbage: path.("garbage.pem")
    }
  end

  defp openssl!(args) do
    case System.cmd("openssl", args, stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, status} -> raise "openssl #{Enum.join(args, " ")} failed (#{status}): #{out}"
    end
  end
end
